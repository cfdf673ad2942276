"""The paper, rebuilt from gate records alone: templated draft, figures, and a fail-closed verifier."""
