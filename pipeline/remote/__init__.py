"""The remote-cluster client: ``imagegen submit / status / logs`` against a remote Ray cluster's
Job Submission API (:mod:`.submit` the commands, :mod:`.dashboard` the connection and its
errors). The job itself then runs :mod:`pipeline.batch` on the cluster.

May import :mod:`pipeline.spec` and :mod:`pipeline.errors`; Ray's job-submission client
is imported only when a command talks to a cluster.
"""
