"""BitMesh: pay-as-you-go Wi-Fi for bitcoin over unidirectional payment channels."""

__version__ = "0.1.0"
