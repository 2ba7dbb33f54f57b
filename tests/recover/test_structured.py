"""shrink_and_evaluate: which text recovery trains on."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from sparsellm.models.tiny import tiny_model
from sparsellm.recover import structured as pipeline


@pytest.mark.parametrize("separate", [False, True])
def test_recovery_trains_on_train_ids_when_given(
    calib_ids: torch.Tensor, monkeypatch: pytest.MonkeyPatch, separate: bool
) -> None:
    seen: list[torch.Tensor] = []

    def fake_recover(student: Any, teacher: Any, data: torch.Tensor, *a: Any, **k: Any) -> dict:
        seen.append(data)
        return {"steps": 1}

    monkeypatch.setattr(pipeline, "recover", fake_recover)
    train = calib_ids.flip(0) if separate else None
    dense = tiny_model("llama")
    _, r = pipeline.shrink_and_evaluate(
        dense, "depth:ratio=0.5", calib_ids, calib_ids, recover_steps=1, train_ids=train
    )
    assert "after" in r and len(seen) == 1
    assert seen[0] is (train if separate else calib_ids)
