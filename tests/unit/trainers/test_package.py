import pytest


def test_the_load_functions_are_importable_from_sonosynth_trainers():
    import sonosynth.trainers as trainers
    from sonosynth.trainers.classifier import load_classifier
    from sonosynth.trainers.sam.models import load_sam_model

    assert trainers.load_sam_model is load_sam_model and trainers.load_classifier is load_classifier
    with pytest.raises(AttributeError, match="no attribute 'load_nothing'"):
        trainers.load_nothing  # noqa: B018
