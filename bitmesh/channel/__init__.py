"""Payment channels: contract, rules, state, ledger, payer and orchestration."""
