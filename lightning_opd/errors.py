"""Errors about models and tokenizers that a user can act on (config errors are
`config.ConfigError`). Its own module so that `models` and `fixtures` both use it without
importing each other."""


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found; the message says what was looked for."""
