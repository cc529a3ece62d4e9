"""A timestep-conditioned image classifier p(y | x_t, t): the guide of classifier guidance."""

from hfx.models.noisy_classifier.modeling_noisy_classifier import NoisyClassifier, NoisyClassifierOutput

__all__ = ["NoisyClassifier", "NoisyClassifierOutput"]
