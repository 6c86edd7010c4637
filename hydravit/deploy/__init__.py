"""Deployment: profile a device, pick the subnetwork for a budget, export it (timm or ONNX), and adapt k
at run time to hold a latency target.

    python -m hydravit.deploy profile|pick|export|serve-bench ...

Every measurement comes from the evaluation core (``hydravit.evaluation``). The ONNX parts need the
``deploy`` extra and are imported only when used.
"""
from .pick import choose, pareto_frontier
from .profile import read_profile, write_profile
from .runtime import CascadeController, ElasticCascadeRunner, ElasticRunner, HeadController, OperatingPoint

__all__ = ['CascadeController', 'ElasticCascadeRunner', 'ElasticRunner', 'HeadController', 'OperatingPoint',
           'choose', 'pareto_frontier', 'read_profile', 'write_profile']
