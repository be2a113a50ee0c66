"""``prepare``: a talking-head video becomes a tracked, segmented, audio-aligned dataset.

Modules: ``pipeline`` (the stages, caching, atomic output), ``command`` (CLI), ``tracking`` (gaps and
identity), ``crop`` (the clip's fixed crop), ``pose`` (template, camera, head pose), ``face_model``
(linear expression model), ``masks`` (segmentation and parsing), ``preview``. Blink and mouth opening
are measured by ``talkinghead.face.landmarks``, as ``eval`` measures them.
Nothing heavy is imported here.
"""
