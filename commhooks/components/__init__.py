"""Level 3, components: one step wrapper per module, each with its typed config. A component
module imports ``commhooks.base`` and ``commhooks.ops`` only, never another component."""
