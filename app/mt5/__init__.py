"""The MT5 connector: its NATS contract (:mod:`app.mt5.contract`, described in
``CONTRACT.md``) and a broker simulator that implements it (:mod:`app.mt5.simulator`)."""
