"""examples/custom_model.py visibly learns, and its tensor-parallel run is the single-process one."""
import importlib.util
from pathlib import Path

from megaengine.testing import run_distributed

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_model.py"


def run_example(rank, world, argv):
    spec = importlib.util.spec_from_file_location("custom_model", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def test_custom_model_learns_and_tp2_matches_tp1():
    (baseline, single), = run_distributed(run_example, 1, ["--tp", "1"])
    tp2 = run_distributed(run_example, 2, ["--tp", "2"])
    assert tp2[0] == tp2[1]  # both tp ranks see the whole loss
    assert tp2[0][0] == baseline
    assert len(single) == 11  # step 0, then every 20 of 200 steps
    assert max(abs(a - b) / b for a, b in zip(tp2[0][1], single)) <= 1e-5, (tp2[0][1], single)
    # Untrained, the model does no better than predicting the mean; trained, far better (measured 0.076x).
    assert single[0] > 0.5 * baseline
    assert single[-1] < 0.2 * baseline, (single, baseline)
