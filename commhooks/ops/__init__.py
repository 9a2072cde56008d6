"""Level 2, shared operations: the component contract, averages, the consensus probe, gradient
pulls and the schedules. Modules here import only ``commhooks.base`` and each other."""
