"""Visualization of SALT point sets and the environment report
(``python -m saltnet.utils.collect_env``)."""
