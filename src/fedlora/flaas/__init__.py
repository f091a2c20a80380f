"""Federated learning as a service: what each device can do (`profiles`), the rank the server plans for it
(`planner`), and a simulated device population's round times (`simulate`). Pure functions and pydantic models;
the run wires them in through `fedlora.flaas.service` (docs/flaas.md).
"""
