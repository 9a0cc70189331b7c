"""The diffusion core: schedules, processes, denoisers, losses, noise, samplers, guidance, operators, ensembles, EMA.

Knows nothing about medicine and imports nothing from the rest of medidiff. Works for any number of
spatial dimensions, on any device. ``samplers`` share one signature with a ``hook`` for data consistency
and gradient guidance (``guidance``, on the linear operators of ``operators``); ``ensemble`` runs N
members per item with derived seeds.
"""
