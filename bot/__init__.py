"""captionbot's Telegram bot: photos in, captions out; votes and corrections stored for training.

Run with ``python -m bot``; see ``.env.example`` for the settings.
"""
