"""The CLI's commands: each module here registers its own with a ``register(commands)``
function (``commands`` is the top-level parser's subparsers); :mod:`torchslim.cli.main`
finds them all."""
