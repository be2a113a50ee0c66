"""``talkinghead serve``: a live avatar in the browser over WebRTC.

:mod:`.app` (HTTP API, signalling, sessions), :mod:`.session` (one media clock, the producer thread, the
tracks' pacing), :mod:`.speech` (upload validation, offline TTS), ``static/`` (the one page, no build step).
Streaming inference itself lives in :mod:`talkinghead.methods.streaming`. Heavy imports (aiohttp, aiortc,
torch) happen when the server starts, not on import.
"""
