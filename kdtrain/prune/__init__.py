"""Students initialised from their teacher: depth and width pruning (``kdtrain prune``).

``select`` says what stays and slices the teacher's parameters, ``importance`` scores layers,
query groups, MLP neurons and hidden channels from activations, ``cli`` ties them together.
"""
