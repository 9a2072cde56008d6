"""Level 1, primitives: flat weights, communication, consistency checks, gradient hooks, the
random streams and the configuration fields. Modules here import only each other and torch."""
