"""A many-host openmicrovm cluster on one machine, for users and tests (needs root):

    python -m openmicrovm.devcluster up --hosts 3 --dir D [--lease-seconds 10] [--setting KEY=VALUE ...]
    python -m openmicrovm.devcluster down --dir D      # after a killed `up`

`up` starts PostgreSQL, moto's S3 server, N host agents (each in a network namespace of its own,
joined to a bridge, at its own address) and two API replicas, then prints the cluster on stdout:
`s3 URL` (put artifact zips there, e.g. in the `artifacts` bucket, and give s3:// URIs to
CreateMicrovmImage), `artifacts s3://BUCKET`, `replica URL` for each replica, `agent URL ...` for
each agent, `state D/cluster.json`, and `endpoint URL` last, once everything is ready. Progress
and errors go to stderr. It runs until SIGTERM, SIGINT or SIGHUP, then stops everything it
started (the agents' sandboxes too) and removes its namespaces and links.

`endpoint` is a TCP balancer in the `up` process: each new connection goes to the next replica in
turn, skipping one that refuses connections, so the endpoint keeps answering when a replica dies
(a connection open to the dying replica is cut; SDKs retry it).

D/cluster.json names every part: the processes' pids (with start times), each agent's namespace,
veth (`link`, its host end: `ip link set LINK down` cuts the agent off, `up` restores it),
address and URL, PostgreSQL's and S3's URLs, and the environment each role got. `down` reads it.
"""
