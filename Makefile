# Everything runs through scripts under infra/ so CI and people use the same steps.
.PHONY: test demo bootstrap faults

# Extra pytest arguments: make test PYTEST_ARGS="-x tests/test_compose.py"
test:
	infra/test.sh $(PYTEST_ARGS)

# make demo DEMO_ARGS=--keep   keeps the dashboard and workers up until Ctrl-C
demo:
	infra/demo.sh $(DEMO_ARGS)

bootstrap:
	infra/bootstrap.sh

# Full-length fault probes on the real services (about 15 minutes), then one table:
# make faults PYTEST_ARGS="--json"
faults:
	infra/faults.sh $(PYTEST_ARGS)
