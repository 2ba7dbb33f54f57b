"""Timing worker for llama.cpp, run with the bench's own venv (bench/.venv-llamacpp).

Started by bench/runtime.py, one process per GGUF, kept alive so the model loads once;
reads commands on stdin and answers one JSON line each, so the parent can alternate
llama.cpp with our runtime without both running at once:

    decode N      greedy-generate N tokens after a fixed 16-token prompt; decode_s is the
                  time from the first generated token to the N-th (N - 1 decode steps,
                  the same definition our runtime reports)
    prefill L     evaluate L prompt tokens from an empty context
"""

from __future__ import annotations

import json
import sys
import time

from llama_cpp import Llama


def main() -> None:
    path, threads = sys.argv[1], int(sys.argv[2])
    llm = Llama(
        model_path=path,
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=4096,
        n_batch=512,
        verbose=False,
    )
    vocab = llm.n_vocab()
    prompt = [(1009 * i + 7) % vocab for i in range(16)]
    print(json.dumps({"ready": True, "version": __import__("llama_cpp").__version__}), flush=True)
    for line in sys.stdin:
        cmd, arg = line.split()
        n = int(arg)
        if cmd == "decode":
            count, first, last = 0, 0.0, 0.0
            for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
                count += 1
                if count == 1:
                    first = time.perf_counter()
                if count == n:
                    last = time.perf_counter()
                    break
            print(json.dumps({"decode_s": last - first, "tokens": count}), flush=True)
        elif cmd == "prefill":
            tokens = [(1009 * i + 7) % vocab for i in range(n)]
            llm.reset()
            t = time.perf_counter()
            llm.eval(tokens)
            print(json.dumps({"prefill_s": time.perf_counter() - t}), flush=True)


if __name__ == "__main__":
    main()
