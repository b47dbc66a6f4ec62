"""Online domain mixing: policies (static, temperature, odm, learnability) and the Mixer."""

from trainer.mixing.mixer import Mixer
from trainer.mixing.policies import POLICIES, DomainStats

__all__ = ["POLICIES", "DomainStats", "Mixer"]
