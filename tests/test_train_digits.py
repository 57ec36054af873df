"""scripts/train_digits.py: a few CPU steps (when scikit-learn is installed), and a clean skip without it."""
import importlib.util
import json
import math
import pathlib
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "train_digits.py"


def _load():
    spec = importlib.util.spec_from_file_location("train_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_few_steps_on_cpu(tmp_path, eager_backend):
    pytest.importorskip("sklearn")
    result = _load().main(["--epochs", "1", "--steps", "3", "--batch-size", "16", "--test-limit", "32",
                           "--device", "cpu",
                           "--output", str(tmp_path)])
    saved = json.loads((tmp_path / "curves.json").read_text())
    for name in ("fused", "reference"):
        losses = saved["curves"][name]["train_loss"]
        assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
        assert 0.0 <= saved["curves"][name]["test_acc"][0] <= 1.0
    # Same weights, same batches, eager computation on both sides: the curves agree.
    assert saved["max_abs_train_loss_diff"] < 1e-4
    assert result["plot"] is None or (tmp_path / "curves.png").stat().st_size > 0


def test_without_sklearn_it_skips_cleanly(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    assert _load().main(["--epochs", "1", "--output", str(tmp_path)]) is None
    assert "scikit-learn is not installed" in capsys.readouterr().err
    assert not (tmp_path / "curves.json").exists()
