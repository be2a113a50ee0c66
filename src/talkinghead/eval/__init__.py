"""Evaluation: the papers' metrics, the stability ("wobble") score, landmark sync, reports and tables.

Modules: ``image_metrics`` (PSNR, SSIM, face masks), ``lpips`` (AlexNet + linear heads, local weights),
``landmark_metrics`` (LMD, mouth-opening correlation, blink error, AU-error proxy), ``stability``
(sec. 3.3 of GaussianFlameTalk), ``sync`` (landmark sync), ``syncnet`` (SyncNet towers, local weights),
``evaluate`` (one pass over a prediction and its reference), ``report`` (metrics.json, report.md, plots,
side-by-side video, comparison tables), ``command`` (the ``eval`` and ``compare`` subcommands).
"""
