"""Config mode: no sidecar at all. The SMDP policy is compiled into Triton's own dynamic_batching
(``compiler``), applied by reloading the model (``smdp config-mode``, ``cli``), and optionally kept
up to date with the measured arrival rate (``follow``)."""
