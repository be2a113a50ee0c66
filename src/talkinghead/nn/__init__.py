"""Network building blocks more than one method uses (moved out of a method's folder when a second needs them).

* :mod:`.triplane` -- the multi-resolution triplane feature field (GaussianTalker eq. 7, DEGSTalk's H);
* :mod:`.audio` -- the audio-window encoder (per-frame MLP, temporal convolutions, attention over the frames);
* :mod:`.encoding` -- fixed input encodings (the blink encoding of the eye tokens).

Nothing is imported here: importing the package stays cheap.
"""
