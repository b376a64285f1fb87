"""Serving the captioner to many callers: a batching worker behind an async interface.

``base`` is the interface the bot talks to (torch-free), ``process`` the worker-process
implementation (torch loads in the worker only), ``config`` its settings::

    service = ProcessCaptionService(ServiceConfig(checkpoint="runs/best", device="auto"))
    await service.start()
    result = await service.caption(photo, beam_size=3)
    await service.close()
"""
