"""`nseh bench`: real migrations of a VM across a matrix of SC sizes, workloads and SC modes.

`matrix` plans the runs, `workloads` makes the load and the SC size, `runner` drives the lab,
`report` turns samples into the summary and its target verdicts, `plots` draws the figures,
`scfill` runs inside a host's namespace to top the VM's conntrack entries up.
"""
