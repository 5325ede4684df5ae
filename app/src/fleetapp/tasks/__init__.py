"""fleetapp's Celery tasks, one module per concern; every task has an explicit name.

Tasks are ``shared_task``s so any app built by fleetapp.celery.create_app (the deployed one, or
one a test builds with another environment) gets them, under the same names.
"""
