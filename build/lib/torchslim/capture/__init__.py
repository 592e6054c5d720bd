"""Capture: one forward pass under the recorder (a ``TorchFunctionMode`` handing each torch
call to its op rule), module hooks, wrappers, and the weightless meta twin traced instead of
the model."""
