"""imgbench: repeatable benchmarks of image-classification services."""

__version__ = "0.1.0"
