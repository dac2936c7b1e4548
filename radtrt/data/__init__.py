"""Training data for radtrt: synthetic phantoms, JSONL manifests, report synthesis, finding labels.

Modules (one concept each):

* ``vocabulary``  -- the phantom finding vocabulary: ``Findings`` (what an image shows) and label names
* ``reports``     -- varied natural-language findings text generated from ``Findings`` (template mode)
* ``labeler``     -- the phrase labeler (report text -> labels) and micro/macro F1
* ``phantoms``    -- rendering radiograph-like images with controllable findings
* ``phantom_set`` -- writing a phantom data set: DICOM (DX/CR, PA + lateral), PNG, manifest
* ``manifest``    -- reading and writing JSONL manifests ``{image, findings, indication, labels}``
* ``chat``        -- a small OpenAI-compatible chat client: rate limit, retries, on-disk cache
* ``synthesize``  -- labels -> findings text through a chat endpoint or the template mode
* ``cli``         -- ``radtrt data phantoms|synthesize`` (registered on the main app)

Everything here is synthetic or user-supplied: phantoms are for pipeline testing, calibration and
demos, never for clinical use.
"""
