"""Keys and certificates other than the ledger's: TLS, node authentication, enrollment
certificates and checkpoint encryption."""
