"""The clipping-unit probe lives with the engine in the kernels package (dplora_kernels.unit_probe);
re-exported here for lalora code and tests."""
from dplora_kernels.unit_probe import ClippingUnitError, take_samples, verify_clipping_unit

__all__ = ["ClippingUnitError", "verify_clipping_unit", "take_samples"]
