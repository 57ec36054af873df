"""scripts/train_digits.py: the data it reads, and a few CPU steps (eager, and on the kernels in the interpreter)."""
import hashlib
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


def _run(tmp_path, *extra):
    result = _load().main(["--epochs", "1", "--device", "cpu", "--output", str(tmp_path), *extra])
    saved = json.loads((tmp_path / "curves.json").read_text())
    for name in ("fused", "reference"):
        losses = saved["curves"][name]["train_loss"]
        assert all(math.isfinite(v) for v in losses)
        assert 0.0 <= saved["curves"][name]["test_acc"][0] <= 1.0
    assert result["plot"] is None or (tmp_path / "curves.png").stat().st_size > 0
    return saved


def test_a_few_steps_on_cpu(tmp_path, eager_backend):
    saved = _run(tmp_path, "--steps", "3", "--batch-size", "8", "--test-limit", "16")
    assert len(saved["curves"]["fused"]["train_loss"]) == 3
    # Same weights, same batches, eager computation on both sides: the curves agree.
    assert saved["max_abs_train_loss_diff"] < 1e-4
    assert abs(saved["acc_gap_points"]) < 1e-9


def test_a_few_steps_on_the_kernels(tmp_path, triton_backend):
    """On the CPU: the converted resnet8 (the script's model at depth 8: one block per stage, identity and
    downsampling shortcuts) trains on the fused kernels (interpreter, fp32) and its losses follow the eager
    reference's. Tiny (batch 2, 2 steps): resnet20 took ~2 min per step in the interpreter, resnet8 ~25 s."""
    saved = _run(tmp_path, "--depth", "8", "--steps", "2", "--batch-size", "2", "--test-limit", "2")
    assert saved["config"]["depth"] == 8
    assert len(saved["curves"]["fused"]["train_loss"]) == 2
    calls = saved["stats"]["kernel_calls"]
    assert calls.get("conv_bn_stats", 0) > 0 and calls.get("bn_add_relu", 0) > 0, calls
    assert not saved["stats"]["fallbacks"], saved["stats"]["fallbacks"]
    assert saved["max_abs_train_loss_diff"] < 1e-3


def test_vendored_data_is_scikit_learns(monkeypatch):
    """Without scikit-learn the script reads its copy of the file; the copy is byte-identical to
    scikit-learn's and parses to load_digits()'s arrays."""
    module = _load()
    sklearn = pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    theirs = pathlib.Path(module.digits_csv_path())
    assert theirs.parent.parent.parent == pathlib.Path(sklearn.__file__).parent
    assert hashlib.sha256(theirs.read_bytes()).hexdigest() == \
        hashlib.sha256(pathlib.Path(module.DIGITS_CSV).read_bytes()).hexdigest()
    images, target = module.read_digits(module.DIGITS_CSV)
    ref = load_digits()
    assert images.shape == (1797, 8, 8) and target.tolist() == ref.target.tolist()
    assert images.double().numpy().tolist() == ref.images.tolist()
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    assert module.digits_csv_path() == module.DIGITS_CSV
