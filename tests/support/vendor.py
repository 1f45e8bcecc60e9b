"""The vendor's own model of a lead body, as the contract check every sandbox fixture runs."""
from __future__ import annotations


def assert_vendor_schema(bodies: list) -> None:
    """Contract check: every body sent validates against the vendor SDK's own model, nulls omitted."""
    from cutmeshort.models.lead_payload import LeadPayload

    for body in bodies:
        assert isinstance(body, dict), body
        assert None not in body.values(), body
        model = LeadPayload.model_validate(body)
        assert model.to_dict().keys() == body.keys(), body  # no field the vendor does not know
