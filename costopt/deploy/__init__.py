"""Deployments: loopback server processes (`processes`), the lasting deployment that outlives a DAG run
(`lasting`) and the Kubernetes manifests for the same variants (`manifests`)."""
