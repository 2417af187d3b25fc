"""Identity providers: each turns a request's credential into an ``Identity`` (see ``base.IdentityProvider``)."""
