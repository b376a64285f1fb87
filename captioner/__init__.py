"""Show, Attend and Tell image captioning: model, decoding, checkpoints and image loading.

This package knows nothing of Telegram or SQL. Import the submodules: ``images``, ``result`` and
``serving.base`` load without torch (the bot uses only those); the rest need it.
"""
