"""The engine's background loop (plan, pace, learn, retrain, live state) and its database lease."""

from ._lease import Lease, LeaseInfo, lease_info
from ._loop import BackgroundLoop, StepRecord

__all__ = ["BackgroundLoop", "Lease", "LeaseInfo", "StepRecord", "lease_info"]
