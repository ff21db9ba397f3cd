//! Card data (PCI DSS): the PAN is validated here and can only leave this type through
//! [`Pan::expose_secret`] (for encryption and the acquirer). Debug and Display show the
//! last four digits; the CVC is never shown and never stored.

use std::fmt;

/// Why card data was refused (messages never contain the number).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CardError {
    /// Not 13–19 digits.
    #[error("must be 13 to 19 digits")]
    Length,
    /// The check digit is wrong.
    #[error("is not a valid card number")]
    Luhn,
    /// Month outside 1–12.
    #[error("must be between 1 and 12")]
    Month,
    /// A year outside a plausible range.
    #[error("must be a four-digit year")]
    Year,
    /// The card expired.
    #[error("card has expired")]
    Expired,
    /// CVC not 3–4 digits.
    #[error("must be 3 or 4 digits")]
    Cvc,
}

/// A primary account number: 13–19 digits with a valid Luhn check digit.
#[derive(Clone, PartialEq, Eq)]
pub struct Pan(String);

impl Pan {
    /// Validates a number (digits only; spaces are not accepted).
    pub fn parse(number: &str) -> Result<Self, CardError> {
        if !(13..=19).contains(&number.len()) || !number.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CardError::Length);
        }
        if !luhn_valid(number) {
            return Err(CardError::Luhn);
        }
        Ok(Self(number.to_owned()))
    }

    /// The number itself: only for encryption, fingerprinting and the acquirer.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// The last four digits.
    pub fn last4(&self) -> &str {
        &self.0[self.0.len() - 4..]
    }

    /// The card brand from the number's prefix.
    pub fn brand(&self) -> &'static str {
        let prefix = |n: usize| self.0[..n].parse::<u32>().unwrap_or(0);
        match prefix(1) {
            4 => "visa",
            _ if (51..=55).contains(&prefix(2)) || (2221..=2720).contains(&prefix(4)) => {
                "mastercard"
            }
            _ if matches!(prefix(2), 34 | 37) => "amex",
            _ if prefix(4) == 6011 || prefix(2) == 65 => "discover",
            _ => "unknown",
        }
    }
}

impl fmt::Debug for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pan(****{})", self.last4())
    }
}

impl fmt::Display for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "****{}", self.last4())
    }
}

/// The Luhn (mod 10) check.
pub fn luhn_valid(digits: &str) -> bool {
    let mut sum = 0u32;
    for (index, byte) in digits.bytes().rev().enumerate() {
        let mut digit = u32::from(byte.wrapping_sub(b'0'));
        if digit > 9 {
            return false;
        }
        if index % 2 == 1 {
            digit *= 2;
            if digit > 9 {
                digit -= 9;
            }
        }
        sum += digit;
    }
    sum.is_multiple_of(10)
}

/// A card as used for one authorization.
#[derive(Clone)]
pub struct CardDetails {
    /// The number.
    pub pan: Pan,
    /// Expiry month, 1–12.
    pub exp_month: u8,
    /// Expiry year.
    pub exp_year: u16,
    /// The CVC, when the caller gave one (never stored).
    pub cvc: Option<Cvc>,
}

impl fmt::Debug for CardDetails {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CardDetails")
            .field("pan", &self.pan)
            .field("exp_month", &self.exp_month)
            .field("exp_year", &self.exp_year)
            .field("cvc", &self.cvc.as_ref().map(|_| "***"))
            .finish()
    }
}

/// A card verification code; never shown, never stored.
#[derive(Clone, PartialEq, Eq)]
pub struct Cvc(String);

impl Cvc {
    /// Validates 3–4 digits.
    pub fn parse(cvc: &str) -> Result<Self, CardError> {
        if !(3..=4).contains(&cvc.len()) || !cvc.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CardError::Cvc);
        }
        Ok(Self(cvc.to_owned()))
    }

    /// The code, for the acquirer only.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Cvc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cvc(***)")
    }
}

/// Validates an expiry against `(year, month)` of today.
pub fn check_expiry(month: i32, year: i32, today: (i32, u32)) -> Result<(u8, u16), CardError> {
    let month = u8::try_from(month)
        .ok()
        .filter(|m| (1..=12).contains(m))
        .ok_or(CardError::Month)?;
    let year = u16::try_from(year)
        .ok()
        .filter(|y| (2000..=2100).contains(y))
        .ok_or(CardError::Year)?;
    if (i32::from(year), u32::from(month)) < today {
        return Err(CardError::Expired);
    }
    Ok((month, year))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pans_are_validated_and_never_shown() {
        let pan = Pan::parse("4242424242424242");
        assert!(pan.is_ok());
        if let Ok(pan) = pan {
            assert_eq!(pan.last4(), "4242");
            assert_eq!(pan.brand(), "visa");
            assert_eq!(format!("{pan:?} {pan}"), "Pan(****4242) ****4242");
        }
        assert_eq!(Pan::parse("4242424242424241"), Err(CardError::Luhn));
        assert_eq!(Pan::parse("4242 4242 4242 4242"), Err(CardError::Length));
        assert_eq!(Pan::parse("424242424242"), Err(CardError::Length));
        assert_eq!(Pan::parse("42424242424242424242"), Err(CardError::Length));
        assert_eq!(
            Pan::parse("5555555555554444").map(|p| p.brand()),
            Ok("mastercard")
        );
        assert_eq!(Pan::parse("378282246310005").map(|p| p.brand()), Ok("amex"));
    }

    #[test]
    fn card_details_debug_hides_number_and_cvc() {
        let card = CardDetails {
            pan: Pan::parse("4000000000000002").unwrap_or_else(|_| Pan("0".repeat(16))),
            exp_month: 12,
            exp_year: 2030,
            cvc: Cvc::parse("123").ok(),
        };
        let shown = format!("{card:?}");
        assert!(
            !shown.contains("4000000000000002") && !shown.contains("123"),
            "{shown}"
        );
    }

    #[test]
    fn expiry_and_cvc_rules() {
        assert_eq!(check_expiry(12, 2030, (2026, 11)), Ok((12, 2030)));
        assert_eq!(check_expiry(11, 2026, (2026, 11)), Ok((11, 2026)));
        assert_eq!(check_expiry(10, 2026, (2026, 11)), Err(CardError::Expired));
        assert_eq!(check_expiry(13, 2030, (2026, 11)), Err(CardError::Month));
        assert_eq!(check_expiry(1, 30, (2026, 11)), Err(CardError::Year));
        assert!(
            Cvc::parse("12").is_err() && Cvc::parse("12a").is_err() && Cvc::parse("1234").is_ok()
        );
    }
}
