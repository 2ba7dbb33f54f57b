"""CLI behaviour on a tiny on-disk model: end to end, and clear errors on bad input."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparsellm.cli import main
from sparsellm.result import Result
from tests.cli import cli_args, last_json


def _args(tiny_dir, text_file, out, *extra):
    return cli_args("prune", tiny_dir, text_file, *extra, out=out)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_prune_end_to_end_json(tiny_dir, text_file, tmp_path, capsys, method):
    out = tmp_path / "sparse"
    code = main(_args(tiny_dir, text_file, out, "--method", method, "--pattern", "2:4", "--json"))
    assert code == 0
    printed = last_json(capsys)
    result = Result.from_dict(printed)
    assert result == Result.read(out)  # --json prints the Result saved as the manifest
    assert result.kind == "prune" and result.method == method
    assert result.recipe["steps"][0]["pattern"] == "2:4"
    assert result.sparsity["target"] == 0.5 == pytest.approx(result.measured_sparsity)
    assert result.metric("after", "ppl") > 0 and result.metric("before", "ppl") > 0
    assert result.metric("comparison", "kl") > 0 and result.timings["sparsify_s"] > 0
    assert result.provenance["calib"]["nsamples"] == 4
    # the flat keys of older versions stay as aliases
    assert printed["sparse_ppl"] == result.metric("after", "ppl")
    assert printed["measured_sparsity"] == result.measured_sparsity
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.model.layers[0].mlp.down_proj.weight == 0).float().mean() == 0.5
    assert (out / "report.md").read_text().count("model.layers.") == 14
    # `eval` on the saved model reproduces the sparse perplexity
    assert (
        main(
            [
                "eval",
                "--model",
                str(out),
                "--eval",
                str(text_file),
                "--seqlen",
                "64",
                "--eval-windows",
                "4",
                "--json",
            ]
        )
        == 0
    )
    again = Result.from_dict(last_json(capsys))
    assert again.kind == "eval"
    assert again.metric("after", "ppl") == pytest.approx(result.metric("after", "ppl"), rel=1e-6)
    assert again.measured_sparsity == pytest.approx(0.5)
    assert again.details["block_linear_sparsity"] == pytest.approx(0.5)


def test_method_spec_and_flag_conflict(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "o"
    args = _args(tiny_dir, text_file, out, "--method", "wanda:sparsity=0.3", "--json")
    assert main(args) == 0
    result = Result.from_dict(last_json(capsys))
    assert result.recipe["steps"][0]["sparsity"] == 0.3
    assert result.measured_sparsity == pytest.approx(0.3, abs=0.01)
    bad = _args(tiny_dir, text_file, tmp_path / "x", "--method", "wanda:sparsity=0.3")
    assert main([*bad, "--sparsity", "0.5"]) == 2
    assert "given both in --method" in capsys.readouterr().err


def test_recipe_file(tiny_dir, text_file, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "- method: wanda\n  sparsity: 0.3\n  targets: ['re:.*mlp']\n"
        "- method: magnitude\n  pattern: '4:8'\n  targets: ['re:.*self_attn']\n"
    )
    assert main(_args(tiny_dir, text_file, tmp_path / "o", "--recipe", str(recipe), "--json")) == 0
    result = Result.from_dict(last_json(capsys))
    assert result.method == "wanda+magnitude"
    layers = result.sparsity["layers"]
    assert layers["model.layers.0.mlp.up_proj"]["sparsity"] == pytest.approx(0.3, abs=0.01)
    assert layers["model.layers.1.self_attn.q_proj"]["sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--sparsity", "1.0"], "sparsity must be in [0, 1)"),
        (["--sparsity", "-0.2"], "sparsity must be in [0, 1)"),
        (["--pattern", "4:4"], "1 <= N < M"),
        (["--pattern", "2:3"], "divide the input dimension"),
        (["--method", "obc"], "unknown method 'obc' (weights); valid: admm, "),
        (["--method", "wanda:damp=0.1"], "unknown key(s) damp for method 'wanda'"),
        (["--nsamples", "1000"], "need 64000"),
        (["--calib", "no-such-corpus"], "neither a bundled name"),
        (["--seqlen", "100000"], "exceeds the model's context window"),
    ],
)
def test_bad_input_one_line_error_nothing_written(
    tiny_dir, text_file, tmp_path, capsys, extra, message
):
    out = tmp_path / "out"
    assert main(_args(tiny_dir, text_file, out, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not out.exists()


def test_bad_model_sources(text_file, tmp_path, capsys):
    junk = tmp_path / "junk.txt"
    junk.write_text("hello")
    for src, message in [(str(tmp_path / "nope"), "unknown model"), (str(junk), "not a model")]:
        assert main(["prune", "--model", src, "--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err


def test_recipe_errors_list_valid_keys(tiny_dir, text_file, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- method: sparsegpt\n  sparsity: 0.5\n  damp: 0.1\n")
    assert main(_args(tiny_dir, text_file, tmp_path / "o", "--recipe", str(recipe))) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) damp" in err and "dampening" in err and "blocksize" in err
    recipe.write_text("- method: [unclosed\n")
    assert main(_args(tiny_dir, text_file, tmp_path / "o", "--recipe", str(recipe))) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_existing_out_dir_needs_overwrite(tiny_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("keep")
    assert main(_args(tiny_dir, text_file, out)) == 2
    assert "--overwrite" in capsys.readouterr().err
    # --overwrite replaces only a previous sparsellm output (one holding its Result)
    assert main(_args(tiny_dir, text_file, out, "--overwrite", "--method", "magnitude")) == 2
    assert "not a sparsellm output" in capsys.readouterr().err
    (out / "x").unlink()
    assert main(_args(tiny_dir, text_file, out, "--method", "magnitude")) == 0
    (out / "x").write_text("stale")
    assert main(_args(tiny_dir, text_file, out, "--overwrite", "--method", "magnitude")) == 0
    assert not (out / "x").exists()


def test_nan_weights_refused(tiny_dir, text_file, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[1, 2] = float("inf")
    model.save_pretrained(tiny_dir)
    assert main(_args(tiny_dir, text_file, tmp_path / "o")) == 2
    assert "NaN/Inf" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.real
def test_prune_with_tasks_kl_and_speed(tiny_dir, text_file, tmp_path, capsys):
    """Zero-shot (real request files), KL and speed flow through CLI, JSON and report."""
    out = tmp_path / "o"
    args = _args(
        tiny_dir,
        text_file,
        out,
        "--method",
        "wanda",
        "--tasks",
        "arc_easy,piqa,naturalqs_open,passkey",
        "--limit",
        "3",
        "--longctx-lengths",
        "300,400",
        "--longctx-samples",
        "1",
        "--speed",
        "--speed-lengths",
        "16,32",
        "--json",
    )
    assert main(args) == 0
    result = Result.from_dict(last_json(capsys))
    assert result.metric("comparison", "kl") > 0
    assert 0 <= result.metric("comparison", "top1_agreement") <= 1
    for side in ("before", "after"):
        tasks = result.metric(side, "tasks")
        assert set(tasks) == {"arc_easy", "piqa", "naturalqs_open", "passkey"}
        assert tasks["piqa"]["docs"] == 3 and tasks["naturalqs_open"]["bpb"] > 0
        assert set(tasks["passkey"]["by_length"]) == {"300", "400"}
    assert set(result.details["speed"]["prefill"]) == {"16", "32"}
    saved = Result.read(out)
    memory = saved.details["speed"]["memory"]  # each model in its own process, after the save
    for side in ("dense", "sparse"):
        assert memory[side]["peak_rss_bytes"] >= memory[side]["after_load_rss_bytes"] > 0
        assert memory[side]["checkpoint_bytes"] > 0
    report = (out / "report.md").read_text()
    assert "## Tasks" in report and "peak RSS MiB" in report and "KL(dense" in report


def test_unknown_task_rejected_before_work(tiny_dir, text_file, tmp_path, capsys):
    assert main(_args(tiny_dir, text_file, tmp_path / "o", "--tasks", "arc_easy,mmlu")) == 2
    assert "unknown task 'mmlu'; valid tasks: arc_easy" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_longctx_length_beyond_window_rejected_before_work(tiny_dir, text_file, tmp_path, capsys):
    args = _args(tiny_dir, text_file, tmp_path / "o", "--tasks", "longctx")
    assert main(args) == 2  # default lengths reach 8192; the tiny model's window is 512
    assert "long-context length 1024 exceeds the model's window 512" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.real
def test_eval_harness_equals_our_scorer_on_the_same_requests(tiny_dir, text_file, capsys):
    pytest.importorskip("lm_eval")
    args = [
        "eval",
        "--model",
        str(tiny_dir),
        "--eval",
        str(text_file),
        "--seqlen",
        "64",
        "--eval-windows",
        "2",
        "--tasks",
        "piqa,lambada",
        "--limit",
        "4",
        "--json",
        "--harness",
        "sparsellm_piqa,sparsellm_lambada",
    ]
    assert main(args) == 0
    result = Result.from_dict(last_json(capsys))
    ours_all, harness = result.metric("after", "tasks"), result.details["harness"]
    for task in ("piqa", "lambada"):
        ours, theirs = ours_all[task], harness[f"sparsellm_{task}"]
        assert theirs["docs"] == ours["docs"] == 4
        assert theirs["acc"] == ours["acc"]
    assert harness["sparsellm_piqa"]["acc_norm"] == ours_all["piqa"]["acc_norm"]


def test_eval_harness_unknown_task_is_a_clear_error(tiny_dir, text_file, capsys):
    pytest.importorskip("lm_eval")
    args = [
        "eval",
        "--model",
        str(tiny_dir),
        "--eval",
        str(text_file),
        "--seqlen",
        "64",
        "--eval-windows",
        "2",
        "--harness",
        "sparsellm_nope",
    ]
    assert main(args) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def _recover_args(tiny_dir, text_file, sparse):
    """`recover` of `sparse` against the tiny dense model on the test corpus."""
    return [
        "recover",
        "--model",
        str(sparse),
        "--teacher",
        str(tiny_dir),
        "--data",
        str(text_file),
        "--eval",
        str(text_file),
        "--seqlen",
        "64",
        "--nsamples",
        "8",
        "--eval-windows",
        "2",
    ]


@pytest.mark.parametrize(
    ("lora", "adapter"), [("0", "lora"), ("2", "lora"), ("2", "sora"), ("2", "dsee")]
)
def test_recover_keeps_zeros_and_records_before_after(
    tiny_dir, text_file, tmp_path, capsys, lora, adapter
):
    sparse = tmp_path / "sparse"
    assert main(_args(tiny_dir, text_file, sparse, "--method", "wanda", "--pattern", "2:4")) == 0
    out = tmp_path / "rec"
    args = [
        *_recover_args(tiny_dir, text_file, sparse),
        "--steps",
        "4",
        "--lr",
        "1e-3",
        "--lora",
        lora,
        "--adapter",
        adapter,
        "--out",
        str(out),
        "--json",
    ]
    assert main(args) == 0
    result = Result.from_dict(last_json(capsys))
    assert len(result.details.get("sora_ranks") or []) == (14 if adapter == "sora" else 0)
    assert result.kind == "recover" and result.method == "wanda"  # the student's recipe
    assert result.details["training"]["steps"] == 4 and result.metric("comparison", "kl") >= 0
    # before = the pruned student, after = the recovered model (both against the teacher)
    ev = ["eval", "--model", str(sparse), "--eval", str(text_file), "--seqlen", "64"]
    assert main([*ev, "--eval-windows", "2", "--json"]) == 0
    pruned = Result.from_dict(last_json(capsys)).metric("after", "ppl")
    assert result.metric("before", "ppl") == pytest.approx(pruned, rel=1e-6)
    assert result.metric("after", "ppl") != pytest.approx(pruned, rel=1e-6)
    assert result.details["teacher"]["ppl"] > 0
    before = AutoModelForCausalLM.from_pretrained(sparse)
    after = AutoModelForCausalLM.from_pretrained(out)
    for (name, p), q in zip(before.named_parameters(), after.parameters(), strict=True):
        if "layers" in name and p.dim() == 2:
            assert (q[p == 0] == 0).all(), name
    assert Result.read(out) == result


def test_recover_adapter_needs_a_rank(tiny_dir, text_file, tmp_path, capsys):
    args = [*_recover_args(tiny_dir, text_file, tmp_path), "--adapter", "sora"]
    assert main([*args, "--out", str(tmp_path / "rec")]) == 2
    assert "--adapter sora needs --lora RANK" in capsys.readouterr().err
    assert not (tmp_path / "rec").exists()


def test_recover_learn_masks_keeps_nm(tiny_dir, text_file, tmp_path, capsys):
    sparse = tmp_path / "sparse"
    assert main(_args(tiny_dir, text_file, sparse, "--method", "wanda", "--pattern", "2:4")) == 0
    out = tmp_path / "rec"
    args = [
        *_recover_args(tiny_dir, text_file, sparse),
        "--steps",
        "0",
        "--learn-masks",
        "2:4",
        "--mask-steps",
        "5",
        "--out",
        str(out),
        "--json",
    ]
    assert main(args) == 0
    result = Result.from_dict(last_json(capsys))
    assert result.details["maskllm"]["steps"] == 5 and result.details["training"] is None
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, p in model.named_parameters():
        if ".layers." in name and p.dim() == 2:
            assert ((p == 0).reshape(p.shape[0], -1, 4).sum(-1) == 2).all(), name
    assert main([*args[:-3], "--learn-masks", "unstructured", "--out", str(tmp_path / "x")]) == 2


def test_recover_soft_prompt_is_saved_and_used_by_eval(tiny_dir, text_file, tmp_path, capsys):
    sparse = tmp_path / "sparse"
    assert main(_args(tiny_dir, text_file, sparse, "--method", "magnitude")) == 0
    out = tmp_path / "rec"
    args = [
        *_recover_args(tiny_dir, text_file, sparse),
        "--steps",
        "0",
        "--soft-prompt",
        "4",
        "--prompt-steps",
        "3",
        "--out",
        str(out),
        "--json",
    ]
    assert main(args) == 0
    result = Result.from_dict(last_json(capsys))
    assert result.details["soft_prompt"]["n_tokens"] == 4
    assert (out / "soft_prompt.safetensors").is_file()
    ev = [
        "eval",
        "--model",
        str(out),
        "--eval",
        str(text_file),
        "--seqlen",
        "64",
        "--eval-windows",
        "2",
        "--json",
    ]
    assert main(ev) == 0
    evaluated = Result.from_dict(last_json(capsys))
    assert evaluated.details["soft_prompt"] is True
    assert evaluated.metric("after", "ppl") == pytest.approx(
        result.metric("after", "ppl"), rel=1e-5
    )
