"""The diffusion core: schedules, processes, denoisers, losses, noise, samplers, EMA.

Knows nothing about medicine and imports nothing from the rest of medidiff. Works for any number of
spatial dimensions, on any device.
"""
