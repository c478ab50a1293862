"""The one base class of the errors a user can fix: a bad config, missing or broken data, an unreachable
tracking store, a source that cannot be registered. The jobs report these as one line without a traceback;
anything else is a bug and keeps its traceback."""


class PipelineError(Exception):
    """A problem in what the user gave (config, data, store, checkpoint), with a message that names it."""


class RegistrationError(PipelineError, RuntimeError):
    """The source cannot be registered: no checkpoint, or a failed verification. Nothing was registered."""
