"""The generic router pipeline: the ``Router``, the interface of each part, and the parts
that several families share (scorers, score functions, selectors, gates, balancers, losses,
capacity, token layout, expert access, transport solvers)."""
