"""``prepare``: a talking-head video becomes a tracked, segmented, audio-aligned dataset.

Modules: ``pipeline`` (the stages, caching, atomic output), ``command`` (CLI), ``tracking`` (gaps and
identity), ``crop`` (the clip's fixed crop), ``pose`` (template, camera, head pose), ``face_model``
(linear expression model), ``blink``, ``masks`` (segmentation and parsing), ``preview``.
Nothing heavy is imported here.
"""
