"""radtrt: run LLaVA-Rad chest X-ray report generation fast on the hardware hospitals own."""

__version__ = "0.1.0"
