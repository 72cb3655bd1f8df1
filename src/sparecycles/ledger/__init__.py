"""Money: double-entry accounts, holds and settlements, pricing, payouts and the auditor."""
