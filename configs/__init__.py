"""The shipped YAML configs (installed as `r1cli.configs`); `r1 configs` lists them."""
