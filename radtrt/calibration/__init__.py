"""Calibration for INT8 export: chest X-ray samples, activation statistics, one versioned file.

* ``samples``  -- which studies calibrate (a folder of studies, a JSONL manifest, or seeded phantoms),
                  read through exactly the inference preprocessing; the sample-list hash
* ``stats``    -- activation statistics from forward hooks on the PyTorch model: vision per-layer
                  ranges, decoder per-input-channel maxima on real multimodal sequences
* ``file``     -- the calibration file (safetensors + JSON metadata), its checks against a model, and
                  reading its decoder statistics where ``--calibration-stats`` expects them
* ``run``      -- ``radtrt calibrate`` and the export's ``--calibration-data`` as library calls
* ``parity``   -- the INT8 parity gate: an INT8 bundle against the fp32 PyTorch model on held-out studies
"""
