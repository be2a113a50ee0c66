"""The one-shot, person-agnostic, emotion-aware 3-D talking face of paper 003 (Qiu et al.).

One model is trained on many people (``talkinghead oneshot train``); it then animates anyone from one
portrait and audio (``talkinghead oneshot render``). Modules, in the paper's order (Fig. 2):

* :mod:`.expression` -- the shared, person-agnostic expression space (our stand-in for 3DMM coefficients);
* :mod:`.motion` -- G_m (audio -> coefficients, eq. 1 with the lip-reading head) and E_m (coefficients -> z_m);
* :mod:`.identity` -- E_id (feature pyramid -> w_id, + w̄_id) and the emotion mapper M_e;
* :mod:`.emotion` -- MEAD's labels, the FACS-prototype expression offsets (the default emotion control);
* :mod:`.synthesis` -- G(w_id, z_m) -> triplanes, rendered by the shared volume renderer + super-resolution;
* :mod:`.model`, :mod:`.data`, :mod:`.train` -- the three training stages (sec. III-C), streamed, DDP, resumable;
* :mod:`.portrait`, :mod:`.render` -- one portrait -> crop, landmarks, pose, coefficients; inversion; video;
* :mod:`.mead`, :mod:`.clip_loss` -- MEAD's folder layout and the CLIP / histogram losses for M_e.
"""
